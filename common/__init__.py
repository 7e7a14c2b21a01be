"""tokenfeed.common"""
