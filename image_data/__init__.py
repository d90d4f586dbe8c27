"""Where images come from and how they become pixels: sources (Hub, folder, streaming), the fast folder listing,
image modes and bit depth, the uint8 pixel cache and its batches, and the record of the training data with the checks
evaluation makes against it (`record`). Training and evaluation both load images here."""
