"""tokenfeed.producer"""
