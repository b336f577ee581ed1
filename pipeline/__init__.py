"""PVEN vehicle re-identification pipeline library."""
