"""trainer: trains a candidate image classifier on a dataset snapshot, evaluates it on the
fixed evaluation set, exports it to ONNX and stores the artifacts with a model card.

The service is `services.trainer.app.create_app`. Nothing is imported here, so the training
pipeline (`binloop train`, a GPU node's training job) loads without the NATS service's
dependencies."""
