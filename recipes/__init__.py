"""Shipped recipes: installed as package data `dcablate.recipes`, addressable by name."""
