"""Thin argparse front ends: parse flags, call one function, print."""
