/* The guide's model: a two-layer perceptron with a learned temperature (docs/guide.md). */
#ifndef GUIDE_MLP_H
#define GUIDE_MLP_H

#include <qkv.h>

typedef struct mlp {
    qkv_module base;           /* first member: the struct is a qkv_module */
    qkv_linear *hidden, *out;  /* submodules, owned through base */
    qkv_tensor *temperature;   /* a parameter of its own, owned through base */
} mlp;

mlp *mlp_new(int64_t in, int64_t hidden, int64_t classes, qkv_generator *g);
qkv_tensor *mlp_forward(mlp *m, const qkv_tensor *x);

#endif
