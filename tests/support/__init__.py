"""Shared test support: dataset factories, process control, the Orthanc harness."""
