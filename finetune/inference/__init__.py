"""Inference: trained models -> predictions (predict), measured accuracy on a labelled folder
(evaluate), and files other tools load (export).
"""
