"""DICOM writers: SEG, TID 1500 SR with the QC contract, secondary-capture overlays."""
