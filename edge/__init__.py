"""What runs on (or for) the bin's Jetson: leaf-node stream sourcing, TensorRT engine builds."""
