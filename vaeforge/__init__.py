"""vaeforge: learn an image collection's style with a convolutional VAE on Ray, then mass-produce samples."""

__version__ = "0.1.0"
