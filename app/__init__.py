"""Merge Studio's Qt front end. The only package that imports Qt."""
