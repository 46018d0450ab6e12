"""Data sets, scenario (class order, phases) and on-device augmentation."""
