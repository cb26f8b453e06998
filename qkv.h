/* qkv: reverse-mode autodiff tensors and neural networks in C. The whole public API. */
#ifndef QKV_H
#define QKV_H

#include "tensor/tensor.h"
#include "autograd/autograd.h"
#include "io/io.h"
#include "nn/nn.h"
#include "optim/optim.h"
#include "data/data.h"
#include "dist/dist.h"

#endif
