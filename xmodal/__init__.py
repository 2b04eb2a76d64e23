"""xmodal: contrastive representation distillation across modalities and from ensembles."""

__version__ = "0.1.0"
