from setuptools import setup

setup(
    name="smoothsa",
    version="0.1.0",
    description="Fast, checkpoint-compatible SmoothSA (object-centric learning with slot attention) in PyTorch + Triton",
    python_requires=">=3.10",
    # `kernels/` and `dataio/` live at the top of the repository but install inside the package: a
    # distribution called `kernels` already exists on PyPI, so a bare top-level import would collide.
    packages=["smoothsa", "smoothsa.kernels", "smoothsa.dataio"],
    package_dir={"smoothsa": "smoothsa", "smoothsa.kernels": "kernels", "smoothsa.dataio": "dataio"},
    # torch is pinned loosely to what the CPU build offers; nothing here may pull a newer torch.
    install_requires=["torch>=2.4", "numpy", "scipy", "lmdb", "pillow", "simplejpeg", "einops", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "dali": ["nvidia-dali-cuda120"],
        "xformers": ["xformers"],
        "movi": ["tensorflow", "tensorflow-datasets"],
        # the YTVIS converter rasterises polygon masks with pycocotools, as the official one does
        "convert": ["pycocotools"],
        "video": ["av"],  # PyAV: video files for `smoothsa.infer` and `convert folder --video`
        "tensorboard": ["tensorboard"],
        "test": ["pytest", "pytest-benchmark", "triton"],
    },
)
