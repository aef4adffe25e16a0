"""Models: encoder construction and the LightningModules (MLM pretraining, multi-task fine-tuning)."""
