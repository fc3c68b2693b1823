"""The frozen base model, its LoRA adapter, the passes over them and local fine-tuning."""
