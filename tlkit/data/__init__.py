"""Images on their way to the model: folders and manifests into examples, decoding, the data
check, augmentation, the tf.data pipeline, augmentation previews, and the checks a command runs
on its inputs before TensorFlow loads.

May import `tlkit.models` (the registry) and `tlkit.core`; nothing above it.
"""
