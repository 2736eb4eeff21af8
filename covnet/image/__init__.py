"""Image primitives: reading and writing CTs (the only place that converts SimpleITK's (x, y, z) to (z, y, x)),
canonical orientation, grids and boxes, resampling, cropping, the HU check and finding CTs in folders."""
