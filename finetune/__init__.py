"""finetune: fine-tune TF-slim's ImageNet InceptionV3 on a folder of labelled images.

Importing the package is cheap; TensorFlow is imported by the modules that need it (through
finetune.compat), not here.
"""

__version__ = "0.1.0"
