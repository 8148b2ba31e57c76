"""The model architectures: one module per family, each class declaring its kind (models/model.py).

``models/registry.py`` imports every module of this package, so a new model is one module here plus its
``models.<kind>`` section in params.yaml.
"""
