"""The shared core every part of the project stands on: configuration, data and artifact contracts,
artifact I/O, the ANN index format and search, the bundle manifest, the Feast store and the training-set
layout. It imports no step (components/), no pipeline and no server."""
