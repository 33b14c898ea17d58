"""Model-side pieces shared by the edge and the trainer: the model card, preprocessing and the
inference backends. Nothing here imports torch; training code lives in services/trainer."""
