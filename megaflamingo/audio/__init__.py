"""Audio front end: decoding, resampling, AF1's sliding windows and the window encoders."""
