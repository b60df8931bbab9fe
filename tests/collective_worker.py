"""A worker for test_launch: counts its threads around 200 gradient all-reduces
under the strategy tftrain creates. Run with TF_CONFIG set."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tftrain.config import ExperimentConfig
    from tftrain.distribute import cluster
    from tftrain.distribute.base import mode_for

    config = ExperimentConfig(
        strategy="multi_worker_mirrored", collective="grpc", model_dir="/unused"
    ).validate()
    placement = mode_for(config, cluster.from_environment()).setup()
    import tensorflow as tf

    strategy = placement.strategy
    grads = [tf.ones([784, 256]), tf.ones([256])]

    def replica_fn():
        tf.distribute.get_replica_context().all_reduce("sum", grads)

    @tf.function
    def reduce_n(n):
        for _ in tf.range(n):
            strategy.run(replica_fn)

    reduce_n(tf.constant(5))
    before = len(os.listdir("/proc/self/task"))
    reduce_n(tf.constant(200))
    after = len(os.listdir("/proc/self/task"))
    print(json.dumps({"before": before, "after": after}), flush=True)


if __name__ == "__main__":
    main()
