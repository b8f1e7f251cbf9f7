"""dcablate: architecture ablations on linear RNNs and MoE models, with static and dynamic short convs."""

__version__ = "0.1.0"
