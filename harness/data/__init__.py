"""Text and token windows: calibration windows and the perplexity protocol, the Brown corpus
package, the on-disk token cache.
"""
