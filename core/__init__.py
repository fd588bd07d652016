"""The train/serve contract, shared by `bitmoji.trainer` and `bitmoji.server` (which never import each other).

- `preprocess`: image bytes -> model input, exactly as training saw them;
- `modelfile`: the one place that writes, reads and verifies model files and their metadata;
- `gradients`: forward, loss, backward (GradientProbe's math, the lecture's walk-through);
- `device`: which torch device a `--device` name means;
- `limits`: defaults both sides agree on (torch-free, so the `--workers` supervisor can read them).

Nothing here imports the trainer, the server or the client, and this file
imports nothing: `import bitmoji.core.limits` costs no torch.
"""
