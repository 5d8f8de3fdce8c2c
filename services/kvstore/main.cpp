int main() { return 0; }  // placeholder until the kvstore service lands
