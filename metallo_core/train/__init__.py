"""Thin Ray layers: Ray Train loops, cluster connection and run settings shared by the stages."""
