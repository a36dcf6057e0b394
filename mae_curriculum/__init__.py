"""mae-curriculum: MAE pre-training with the EfficientTrain++ curriculum and SeTa pruning."""
__version__ = "0.1.0"
