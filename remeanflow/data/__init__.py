"""Dataset stages: toy archive (`toy`), download (`download`), streaming ImageNet-tar reader
(`imagenet_tar`), preprocessing to Zarr (`preprocess`).

Nothing is re-exported here on purpose: a rule's code version is the import closure of its script
(`provenance.import_closure`), and importing one data module must not pull in the others.
"""
