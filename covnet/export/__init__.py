"""What covnet writes for other tools to read: DICOM-SEG for viewers and PACS."""
