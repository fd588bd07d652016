"""Train the lecture's bitmoji classifier (and a CNN that beats it) and export it as TorchScript.

The server imports three small modules from here, so that training and serving
can never disagree: `preprocess` (bytes -> model input), `modelfile` (the one
place that saves and loads model files) and `gradients` (the GradientProbe math).
"""
