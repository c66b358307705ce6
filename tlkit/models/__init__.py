"""What the network is: the backbone registry, where its weights come from (the PyTorch
checkpoint reader among them), the classifier built around it, freeze plans, trunk / tail cuts,
and where it runs (tf.distribute strategies, the traced predictor).

May import `tlkit.core`; nothing above it (data, features, training, evaluation, cli).
"""
