"""Two conv+pool blocks and a dense head on Fashion-MNIST.

The benchmark table's TensorFlow-tutorial "2 Conv+pooling" reached 0.916.
Adam at 1e-3 with cosine decay over 12 epochs; dropout 0.4 on the dense
layer, as in that tutorial.
"""

import tftrain


def get_config(variant: str | None = None) -> tftrain.ExperimentConfig:
    config = tftrain.ExperimentConfig(
        experiment="fashion_mnist_cnn",
        dataset="fashion_mnist",
        model="cnn",
        optimizer="adam",
        learning_rate=1e-3,
        lr_schedule="cosine",
        batch_size=100,
        epochs=12,
        steps_per_loop=100,
    )
    if variant == "smoke":
        config = config.replace(
            max_train_examples=1000, max_eval_examples=500, epochs=1, steps_per_loop=5
        )
    return config
