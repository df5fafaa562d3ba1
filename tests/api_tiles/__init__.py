"""Tests of the tile API (IIIF, Deep Zoom, viewer); a package, see conftest.py."""
