// placeholder: CPU kernels land here
