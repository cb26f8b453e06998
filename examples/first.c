#include <qkv.h>

int main(void) {
    qkv_scope_begin();
    qkv_tensor *x = qkv_requires_grad_(qkv_arange(QKV_F32, -1, 1, 0.5), true);
    qkv_tensor *y = qkv_sum_all(qkv_mul(qkv_tanh(x), x));   /* sum(x * tanh(x)) */
    qkv_backward(y);
    qkv_print(y);
    qkv_print(x->grad);                                     /* tanh(x) + x (1 - tanh(x)^2) */
    qkv_scope_end();                                        /* frees every tensor above */
    return qkv_error() != NULL;
}
