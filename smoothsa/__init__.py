"""SmoothSA: slot attention over DINOv2 features, checkpoint-compatible with the official code."""
