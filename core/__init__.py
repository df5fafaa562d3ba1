"""Settings, domain values, errors and logging. Imports nothing of ours (STYLE.md §1)."""

#: The one place the version is written (issue 15): pyproject.toml reads it
#: (``[tool.setuptools.dynamic]``), and the CLI, the OpenAPI document and the FHIR
#: CapabilityStatement show it. In ``core`` so that every layer may import it.
__version__ = "0.1.0"
