"""Model-side pieces shared by the edge and the trainer: the model card, preprocessing, the
inference backends and the order of the registry's champion decisions (decisions.py). Nothing
here imports torch; training code lives in services/trainer."""
