"""The ``slai-serve`` product command and the local launcher (``up``)."""
