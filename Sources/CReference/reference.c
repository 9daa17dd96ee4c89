#include "creference.h"
