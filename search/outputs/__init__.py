"""What every stage writes and measures: files written whole and read back with clear errors
(`records`), every figure (`plots`), the clinical read-out (`evaluate`) and calibration. Imports no
other part of the search."""
