"""Pure tensor maths: soft and hard clustering, vector layouts, bit packing, dtype rules.

Nothing here knows about modules, models or policies, and nothing here
imports from the rest of dkm_param (a test checks it).
"""
