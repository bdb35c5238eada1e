"""vgpt: data-efficient image captioning with VisualGPT (SRAU-gated pretrained language models)."""

__version__ = "0.2.0"
