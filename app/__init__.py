"""GSM8K post-training pipeline: SFT -> rollouts -> preferences -> DPO -> eval."""

__version__ = "0.1.0"
