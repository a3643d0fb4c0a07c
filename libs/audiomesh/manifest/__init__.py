"""Job manifests: the JSON record of everything that happened to a job."""

SCHEMA_VERSION = 1
