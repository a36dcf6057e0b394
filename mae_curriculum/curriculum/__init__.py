from .fourier import fourier_crop

__all__ = ["fourier_crop"]
