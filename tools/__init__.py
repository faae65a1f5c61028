"""The project's tools (benchmark, offline teachers, ablation, retention, the labelled example, plots),
run from the repository root as `python -m tools.NAME`. A regular package (this file), so that an installed
package named `tools` cannot shadow it."""
